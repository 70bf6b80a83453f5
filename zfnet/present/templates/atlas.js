// zfnet feature atlas: draws the repeated parts of the pages from the data scripts (layers/<layer>.js,
// sources.js, search.js), runs the search box and the sort control. Works from file://. Every value from
// the data is set as text, an attribute or a style property, never parsed as HTML.
(function () {
  "use strict";
  var root = document.body.getAttribute("data-root") || "./";
  var A = window.ZFNET_ATLAS, S = window.ZFNET_SOURCES, LAYERS = window.ZFNET_LAYERS || {};

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) { return v === null || v === undefined ? "\u2013" : String(Number(v.toPrecision(4))); }
  function path(p) { return p.split("/").map(encodeURIComponent).join("/"); }
  function unitPage(file, ch) { return root + "units/" + file + "_" + ch + ".html"; }
  function layerPage(file) { return root + "layers/" + file + ".html"; }
  function view(i) { return root + path(S ? S.items[i][4] : "images/" + i + ".jpg"); }

  // ---- tiles: a projection is a crop of the unit's sprite, a patch a crop of the image's view
  function projection(L, ch, j, shown) {
    var th = L.size[0], tw = L.size[1], s = (shown || th) / th;
    var r = Math.floor(j / L.ncol), c = j % L.ncol, rows = Math.ceil(L.k / L.ncol);
    var t = el("span", "t");
    t.style.width = Math.round(tw * s) + "px";
    t.style.height = Math.round(th * s) + "px";
    t.style.backgroundImage = "url(\"" + root + "units/" + path(L.file) + "_" + ch + "." + L.ext + "\")";
    t.style.backgroundSize = (L.gap + L.ncol * (tw + L.gap)) * s + "px " + (L.gap + rows * (th + L.gap)) * s + "px";
    t.style.backgroundPosition = -(L.gap + c * (tw + L.gap)) * s + "px " + -(L.gap + r * (th + L.gap)) * s + "px";
    return t;
  }
  function patch(L, e, shown) {
    // e = [image, value, y, x, y0, y1, x0, x1, oy, ox]: the field box and its place in the tile
    var th = L.size[0], tw = L.size[1], fh = L.field[0], fw = L.field[1];
    var sy = (shown || th) / fh, sx = (shown || th) * tw / th / fw;
    var t = el("span", sy >= 2 ? "t px" : "t");
    t.style.width = Math.round(fw * sx) + "px";
    t.style.height = Math.round(fh * sy) + "px";
    t.style.backgroundImage = "url(\"" + view(e[0]) + "\")";
    t.style.backgroundSize = L.input[1] * sx + "px " + L.input[0] * sy + "px";
    t.style.backgroundPosition = (e[9] - e[6]) * sx + "px " + (e[8] - e[4]) * sy + "px";
    return t;
  }

  // ---- layer pages: the patches of every unit thumbnail
  document.querySelectorAll(".units[data-layer]").forEach(function (box) {
    var L = LAYERS[box.getAttribute("data-layer")];
    if (!L) return;
    box.querySelectorAll(".unit").forEach(function (card) {
      var grid = card.querySelector(".grid"), entries = L.units[card.getAttribute("data-ch")] || [];
      if (!grid) return;
      entries.forEach(function (e) { grid.appendChild(patch(L, e, L.thumb)); });
    });
  });

  // ---- unit pages: each top activation with its projection, patch, input, file, label and prediction
  document.querySelectorAll(".entries[data-layer]").forEach(function (box) {
    var L = LAYERS[box.getAttribute("data-layer")], ch = box.getAttribute("data-ch");
    if (!L) return;
    (L.units[ch] || []).forEach(function (e, j) {
      var src = S ? S.items[e[0]] : null, H = L.input[0], W = L.input[1];
      var fig = el("figure", "entry"), pair = el("div", "pair"), full = el("span", "full");
      var img = el("img"), mark = el("span", "box");
      img.src = view(e[0]); img.width = 168; img.height = 168; img.alt = "input of #" + (j + 1);
      mark.style.top = 100 * e[4] / H + "%"; mark.style.height = 100 * (e[5] - e[4]) / H + "%";
      mark.style.left = 100 * e[6] / W + "%"; mark.style.width = 100 * (e[7] - e[6]) / W + "%";
      full.appendChild(img); full.appendChild(mark);
      pair.appendChild(projection(L, ch, j)); pair.appendChild(patch(L, e)); pair.appendChild(full);
      var cap = el("figcaption");
      cap.appendChild(document.createTextNode("#" + (j + 1) + " value "));
      cap.appendChild(el("b", "", fmt(e[1])));
      cap.appendChild(document.createTextNode(" at (" + e[2] + ", " + e[3] + ")"));
      if (src) {
        var a = el("a", "", src[0]);
        a.href = src[0].charAt(0) === "/" ? "file://" + path(src[0]) : root + (S.data ? path(S.data) + "/" : "") + path(src[0]);
        cap.appendChild(el("br")); cap.appendChild(a);
        if (src[1] !== null) { cap.appendChild(el("br")); cap.appendChild(document.createTextNode("label ")); cap.appendChild(el("b", "", src[1])); }
        if (src[2] !== null) {
          cap.appendChild(el("br")); cap.appendChild(document.createTextNode("predicted "));
          cap.appendChild(el("b", "", src[2])); cap.appendChild(document.createTextNode(" (" + Math.round(100 * src[3]) + " %)"));
        }
      }
      fig.appendChild(pair); fig.appendChild(cap); box.appendChild(fig);
    });
  });

  // ---- search: a unit address or a layer name goes there; a class name lists its units
  function find(q) {
    q = q.trim();
    if (!q || !A) return {list: []};
    var m = /^(.+):(\d+)$/.exec(q);
    for (var i = 0; i < A.layers.length; i++) {
      var L = A.layers[i];
      if (m && L.name === m[1] && +m[2] < L.channels) return {go: unitPage(L.file, +m[2])};
      if (L.name === q) return {go: layerPage(L.file)};
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
    var list = A.layers.filter(function (L) { return L.name.toLowerCase().indexOf(needle) >= 0; })
      .map(function (L) { return ["layer " + L.name, layerPage(L.file)]; });
    found.slice(0, 100).forEach(function (f) {
      var L = A.layers[f[2][0]];
      list.push([L.name + ":" + f[2][1] + "  " + A.classes[f[3]] + " \u00d7" + f[0], unitPage(L.file, f[2][1])]);
    });
    return {list: list};
  }

  var header = document.querySelector("header");
  if (header && A) {
    var form = el("form", "search"), input = el("input"), results = el("ul", "results");
    form.setAttribute("role", "search");
    input.type = "search";
    input.placeholder = "unit (" + (A.layers.length ? A.layers[A.layers.length - 1].name : "layer") + ":7), layer or class";
    input.setAttribute("aria-label", "search units, layers and classes");
    form.appendChild(input); form.appendChild(results); header.appendChild(form);
    var show = function (r) {
      results.textContent = "";
      (r.list || []).forEach(function (item) {
        var li = el("li"), a = el("a", "", item[0]);
        a.href = item[1]; li.appendChild(a); results.appendChild(li);
      });
      if (r.list && !r.list.length && input.value.trim()) results.appendChild(el("li", "muted", "no unit, layer or class matches"));
    };
    input.addEventListener("input", function () {
      var r = find(input.value);
      show(r.go ? {list: [["go to " + input.value.trim(), r.go]]} : r);
    });
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var r = find(input.value);
      if (r.go) window.location.href = r.go;
      else if (r.list.length === 1) window.location.href = r.list[0][1];
      else show(r);
    });
  }

  // ---- sort the unit thumbnails of a layer page
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
