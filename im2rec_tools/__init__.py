"""im2rec_tools: build, check and demo the RecordIO image shards that xception_mx trains on.

Commands (``python -m im2rec_tools <command> --help``): ``make-list``, ``pack``, ``verify``, ``demo-digits``.
The on-disk format is MXNet's: ``.lst`` image lists, ``.rec`` RecordIO shards named ``PREFIX-00000-of-00004.rec``
with an ``.idx`` beside each. Importing this package is cheap: heavy modules load only when a command runs.
"""
