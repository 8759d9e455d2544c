"""rawcast.model.recipe: the offline data generation and training recipe for rawcast-tiny."""
