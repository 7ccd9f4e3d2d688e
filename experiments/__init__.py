"""The experiment suite: one training loop, the tasks and their rollout evaluators.

The training loop and the LM task come next (see the README's "Status"); the optimizer library
they use is `dopr`.
"""
