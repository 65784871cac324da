"""Operations: model registry and promotion gate, drift check and its report."""
