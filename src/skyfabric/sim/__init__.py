"""Fleet-scale discrete-event simulation of the gateway before a planned fleet (``skyfabric simulate``)."""
