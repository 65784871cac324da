"""Online serving: scoring with folded-in user state, the user state store, the HTTP guard, and the one adapter
to BentoML internals (`bentoml_adapter`)."""
