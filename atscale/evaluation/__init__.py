"""Evaluation (layer above checkpoint, attacks, data and models; below training): suites of attacks as data
(:mod:`.suites`), the one evaluator that runs them with one accuracy rule (:mod:`.evaluator`), gradient-masking checks
(:mod:`.sanity`), distribution-shift test sets (:mod:`.shift`), what an evaluation writes (:mod:`.outputs`) and the
evaluation of a checkpoint (:mod:`.checkpoint_eval`). Never imports training.
"""
