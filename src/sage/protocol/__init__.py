"""Wire protocols SAGE speaks, as typed models: one definition that validates requests at the
edge and in our engines, and that the OpenAPI document is generated from."""
