"""The benchmarks, apart from the compiler they measure.

`python -m compressor.bench NAME` (`__main__`) runs one of `losses`, `partial`, `engine`,
`llm`, `distributed`; `compress bench` on a finished run is `deploy`. Each benchmark is a
module of its own, imported only when it runs: importing this package imports none of them.
"""
