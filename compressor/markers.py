"""compressor's pluggy markers, apart from the hook specifications so that importing
`compressor` (for `hookimpl`) imports nothing else of the core."""

import pluggy

PROJECT = "compressor"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)  # marks a plugin's hook implementations
