"""Fixtures shared by the zoo (helpers live in ``zoo_helpers``, importable from every zoo test)."""
