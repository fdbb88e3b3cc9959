"""Edit methods: ROME and r-ROME, EMMET, MEMIT and AlphaEdit, concept erasure."""
