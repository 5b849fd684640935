"""What the Redis bus and the Redis live state share: one way to reach Redis and to live with it.

`keys` lays out every key; `address` parses the URL once (both clients connect from it, TLS
included); `connect` opens redis-py clients and the lean `resp` connections with one set of
timeouts; `link` is what one pod's user of Redis holds (pod id, keys, address, client);
`pipelines` batches round trips; `health` is the one failure guard, `backoff` the one back-off,
`streams` the one blocking stream reader; `waiting` is the start-up wait and `cancel` the shutdown
of tasks that may sit inside redis-py. Neither the bus nor the live state imports the other.
"""
