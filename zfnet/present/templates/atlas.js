// zfnet feature atlas: the search box and the sort control. Works from file:// (the index is search.js,
// loaded as a script); results are built with textContent, never as HTML.
(function () {
  "use strict";
  var A = window.ZFNET_ATLAS, root = document.body.getAttribute("data-root") || "./";

  function unitPage(layer, ch) { return root + "units/" + layer.file + "_" + ch + ".html"; }
  function layerPage(layer) { return root + "layers/" + layer.file + ".html"; }

  function find(q) {
    // -> {go: url} for a unit address or a layer name, else {list: [[text, url], ...]} of matching units
    q = q.trim();
    if (!q || !A) return {list: []};
    var m = /^(.+):(\d+)$/.exec(q);
    for (var i = 0; i < A.layers.length; i++) {
      var L = A.layers[i];
      if (m && L.name === m[1] && +m[2] < L.channels) return {go: unitPage(L, +m[2])};
      if (L.name === q) return {go: layerPage(L)};
    }
    var needle = q.toLowerCase(), hits = [];
    A.classes.forEach(function (name, ci) { if (name.toLowerCase().indexOf(needle) >= 0) hits.push(ci); });
    var found = [];
    A.units.forEach(function (u) {
      var best = 0, which = -1;
      for (var t = 0; t < u[3].length; t += 2) {
        if (hits.indexOf(u[3][t]) >= 0 && u[3][t + 1] > best) { best = u[3][t + 1]; which = u[3][t]; }
      }
      if (which >= 0) found.push([best, u[2] || 0, u, which]);
    });
    found.sort(function (a, b) { return b[0] - a[0] || b[1] - a[1]; });
    var layerNames = A.layers.filter(function (L) { return L.name.toLowerCase().indexOf(needle) >= 0; });
    var list = layerNames.map(function (L) { return ["layer " + L.name, layerPage(L)]; });
    found.slice(0, 100).forEach(function (f) {
      var L = A.layers[f[2][0]];
      list.push([L.name + ":" + f[2][1] + "  " + A.classes[f[3]] + " \u00d7" + f[0], unitPage(L, f[2][1])]);
    });
    return {list: list};
  }

  document.querySelectorAll("form.search").forEach(function (form) {
    var input = form.querySelector("input"), results = form.querySelector(".results");
    function show(r) {
      results.textContent = "";
      (r.list || []).forEach(function (item) {
        var li = document.createElement("li"), a = document.createElement("a");
        a.href = item[1]; a.textContent = item[0]; li.appendChild(a); results.appendChild(li);
      });
      if (r.list && !r.list.length && input.value.trim()) {
        var li = document.createElement("li"); li.className = "muted"; li.textContent = "no unit, layer or class matches";
        results.appendChild(li);
      }
    }
    input.addEventListener("input", function () { var r = find(input.value); show(r.go ? {list: [["go to " + input.value.trim(), r.go]]} : r); });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var r = find(input.value);
      if (r.go) window.location.href = r.go;
      else if (r.list.length === 1) window.location.href = r.list[0][1];
      else show(r);
    });
  });

  document.querySelectorAll("select.sort").forEach(function (sel) {
    sel.addEventListener("change", function () {
      var box = document.querySelector(".units"), cards = Array.prototype.slice.call(box.children);
      var key = sel.value === "max" ? function (e) { return -parseFloat(e.getAttribute("data-max")); }
                                    : function (e) { return +e.getAttribute("data-ch"); };
      cards.sort(function (a, b) { return key(a) - key(b) || (+a.getAttribute("data-ch")) - (+b.getAttribute("data-ch")); });
      cards.forEach(function (c) { box.appendChild(c); });
    });
  });
})();
