"""``fedmq fieldtest``: a whole deployment on one machine under a fault schedule,
every round checked against the exact weighted mean of its survivors' updates."""
