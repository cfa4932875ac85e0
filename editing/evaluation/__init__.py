"""How well editing methods work, measured as the papers do.

:mod:`~editing.evaluation.cases` builds CounterFact-style cases from facts a model
knows; :mod:`~editing.evaluation.evaluate` scores a method on them (efficacy,
paraphrase, neighbourhood, fluency; single edits, MEMIT batches, sequential
edits); :mod:`~editing.evaluation.sweep` edits at every candidate layer and
compares with the causal trace; :mod:`~editing.evaluation.tune` chooses ROME's
hyperparameters on a grid. Their command lines are ``python -m editing.cases``,
``editing.evaluate``, ``editing.sweep`` and ``editing.tune``.

Example::

    from editing.evaluation.evaluate import evaluate_cases, read_cases
    result = evaluate_cases(lm, read_cases("assets/counterfact_smollm2_tune.json")[:5], method="rome")
    result["post"]["S"]
"""
