"""The wire protocol: what travels over MQTT and how it is checked.

The msgpack envelope and body encoding (``wire``), the body schemas (``messages``)
and their strict field types (``fields``), the topic tree (``topics``),
cutting bodies into chunks and putting them back together under a digest
(``chunking``), and reading a large update straight off disk without joining it
(``update_stream``). Pure data and validation: no sockets, no torch; signatures are checked with
``fedmq.privacy.signing``.
"""
