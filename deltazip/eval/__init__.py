"""Quality evaluation: the report (eval.report), model scoring (eval.scoring) and baselines (eval.baselines).

Imports run one way: report → scoring, baselines → deltazip.hf; baselines never import the report.
"""
