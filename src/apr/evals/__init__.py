"""Evaluations of the code a model writes: `python_syntax` (parse only), `humaneval` (tests run in the
`sandbox`), and `code` (extracting code from model output, AST summaries)."""
