"""The ground floor every other package stands on: the typed errors (:mod:`~medcls.core.errors`,
messages for the person in front of the screen), the one frozen :class:`~medcls.core.settings.Settings`,
who may do what (:mod:`~medcls.core.access`) and safe cells for exported tables
(:mod:`~medcls.core.csvsafe`)."""
