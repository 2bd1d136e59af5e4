"""`potstill search` and `potstill advise`: which student, which teacher, which recipe.

`space` (the search space YAML), `trial` (one candidate applied to the recipe and measured), `study` (the resumable
Optuna study), `pareto` (front, table, plot, recipes, search.json), `advise` (the capacity-gap advisor),
`recommender` (AutoDistiller-style predictor on search logs), `command` (the CLI functions).
"""
