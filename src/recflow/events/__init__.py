"""Events in: the contract, column parsing, file I/O, importers and the generator."""
