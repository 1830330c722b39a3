"""Durable state: the journal of each controller (``journal``) and the state directory that
holds them all (``journals``: where it is, one journal per controller, adoption, the view
across every journal)."""
