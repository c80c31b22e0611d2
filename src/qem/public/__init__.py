"""The public side of a round (docs/theory.md §13): everything a round computes from public
data and earlier releases before it reads private data: the subspace, the public quadratic and
the clip norm, each on its own cadence."""
