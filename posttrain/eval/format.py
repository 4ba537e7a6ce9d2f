"""What `posttrain eval` writes and `posttrain report` reads, kept apart from both so the report
can be rendered without importing the eval run's model code."""

FORMAT = "posttrain-eval/1"
"""eval.json's "format"; `posttrain report` refuses a file of another."""

SHOWCASE_PROMPT = "Explain the moon landing to a 6 year old in a few sentences."
"""The notes' example prompt: every evaluated model answers it too, and the report opens with the answers."""
