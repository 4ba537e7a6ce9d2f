"""Evaluation: win rates and their intervals (`metrics`, pure functions), the KL estimate's
log-probs (`kl`), eval runs (`run.evaluate`, `posttrain eval`) and the HTML report (`report`,
`posttrain report`).

Nothing is imported here: `posttrain.eval.cli` is loaded whenever the command line is parsed,
and must not pull in torch or matplotlib with it.
"""
