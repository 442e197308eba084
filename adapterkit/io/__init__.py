"""The format layer's input and output, with no deep-learning framework (as safetensors needs none).

- :mod:`.safetensors`: the one parser of the container (strict), and its writers (whole file, streamed);
- :mod:`.adapter_file`: adapter files: load, parse, save;
- :mod:`.checkpoint`: a base model's safetensors weights (a folder, shards, or one file), read lazily;
- :mod:`.outputs`: the one output discipline every command writes through (atomic, locked, never over an input);
- :mod:`.paths`: opening inputs (regular files only, never blocking);
- :mod:`.digest`: sha256 of files.
"""
