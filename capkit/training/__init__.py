"""
Training's configuration and state: train.py's hyperparameters read and checked (config.py), read as their user
meant them (implied.py), --help (usage.py), and runs that survive an interruption (resume.py). The training loop
itself is train.py. Imports the models, the data and the shared leaves.
"""
