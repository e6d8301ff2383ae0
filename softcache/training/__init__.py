"""The training pieces every trainer shares: the epoch loop (loop.py) and the step objects (steps.py). The
trainers themselves (train-teacher, train-student, train-online) are softcache.train."""
