"""What crosses the socketpair between the gateway and a KMS worker.  Shared by both sides.

``protocol``  the framed wire protocol (sans-I/O, in the manner of h11)
``_values``, ``_events``, ``_trusted``  its value encoding, events and trusted constructors,
              re-exported by ``protocol``
``model``     key metadata records and states: public facts only

Nothing here performs I/O or holds a private key, so both processes import it; the
``.importlinter`` contract ``kms-wire-is-sans-io`` keeps trio and sockets out.
"""
