"""`zfnet report`: one resumable run of the paper's experiments (and the CS231n notes') on a user's model and
data, written up as one offline HTML page (zfnet.present.report reads the saved result folders).

Above the sections (rank 6): may import every subpackage except zfnet.cli.
"""
