"""Developer tools: build the demo assets, measure the results tables, benchmark training and serving.
Run from the repository root as modules: python -m tools.demo_assets, python -m tools.targets, ..."""
