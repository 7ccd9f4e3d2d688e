"""The experiment suite: one training loop (``experiments.train``), the tasks
(``experiments.tasks``) and their rollout evaluators. The optimizers come from ``dopr``."""
