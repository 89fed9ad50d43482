"""The test suite mirrors the package: ``tests/<subpackage>/`` tests ``signalprop.<subpackage>``
(top-level modules such as ``record`` and ``stats`` are tested in ``tests/`` itself);
``tests/zoo/`` runs real architectures across the package, ``tests/faults/`` bad input and
interruptions, ``tests/docs/`` the README, guides and examples. Every folder is a package so that
two folders may hold test modules of the same name."""
