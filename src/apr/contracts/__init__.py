"""Ship contracts: falsifiable acceptance criteria about one model artifact, and the `pv` tool.

`pv validate` checks a contract's schema and consistency, `pv lint` also proves its test bindings resolve,
`pv discharge` runs a criterion's live check and records the evidence, `pv status` computes ship %.
See docs/contracts.md.
"""

from apr.contracts.loader import ContractError, Diagnostic

__all__ = ["ContractError", "Diagnostic"]
