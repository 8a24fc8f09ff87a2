"""Evaluation of adapters: text metrics and the report (:mod:`.metrics`), generation tasks (:mod:`.tasks`), the one
batched greedy generator (:mod:`.generation`) and lm-evaluation-harness (:mod:`.lm_eval`)."""
