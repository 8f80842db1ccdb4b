"""The operator dashboard (/dashboard): static pages over the admin API, and the admin API's live views.

`routes` serves the pages and the login; `views` builds what /admin/pool and /admin/requests show; `stream`
turns the controller's EventBus into server-sent events; `activity` is the rolling window behind the figures;
`session` the login sessions. (No imports here: controller.api.auth imports `session` alone.)
"""
