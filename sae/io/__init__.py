"""Files: atomic writes (``files``), content digests and their sidecars (``digests``),
tensor files with verified digests (``tensors``), the code version (``version``),
JSON-canonical plain data (``plain``) and the identity of weights and folders
(``fingerprint``). Nothing here imports torch at import time."""
