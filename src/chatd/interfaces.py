# -*- test-case-name: tests.test_store -*-
"""
The contracts adapters share.
"""

from zope.interface import Attribute, Interface

__all__ = ["IBus", "IBusListener", "IBusSubscription", "IIdentityStore", "IMessageStore"]


class IMessageStore(Interface):
    """
    Durable home of rooms and messages, and the one place that assigns
    per-room sequence numbers.

    Every method returns a Deferred; none blocks the reactor thread.
    """

    description = Attribute("A short human-readable name, e.g. 'memory'.")

    def open():
        """
        Connect and create or upgrade the schema.

        @return: Deferred firing when the store is ready.
        """

    def load_rooms():
        """
        @return: Deferred firing with a list of C{(name, last_seq)} tuples.
        """

    def room_state(name):
        """
        Look up one room.

        @return: Deferred firing with C{(last_seq, first_seq)} for a room
            that exists (C{first_seq}: the oldest seq still held, or the
            next seq to be issued if none is), or C{None}.
        """

    def room_access(name):
        """
        Who may use a room, read in one snapshot.

        @return: Deferred firing with a L{chatd.model.RoomAccess} (its
            C{last_seq}: the room's, as of those members), or C{None}.
        """

    def rooms_of(user_id):
        """
        @return: Deferred firing with C{{room: role}} of C{user_id}.
        """

    def create_room(name, now_ms, max_rooms=None, private=False, guests=True, owner=None):
        """
        Create a room with no messages, unless it exists, or the store
        already holds C{max_rooms} rooms (counted in the store, so that
        the limit holds for every node sharing it): public or C{private},
        letting C{guests} in or not, with C{owner} (a
        L{chatd.model.User}), if given, as its first member.

        @return: Deferred firing with C{True} if it was created, C{False}
            if a room of that name already existed, or failing with
            L{chatd.model.RoomLimitReached}.
        """

    def append(room, nick, body, ts_ms, client_id, user=None, kind="message", target=None, meta=None, guard=None):
        """
        Store an event, giving it the room's next seq (last seq + 1), and
        make its effects in the same transaction:

          - C{kind} C{"message"}: a chat message (C{user}: its sender, if
            known; C{nick}: their name);
          - C{"member"}: C{user} becomes a member with role C{body}, or is
            no longer one if C{body} is empty;
          - C{"edit"}: message C{target} gets C{body} (and C{edited_ms});
          - C{"delete"}: message C{target} and its edits are blanked (and it
            gets C{deleted_ms});
          - C{"moderation"}: C{meta["action"]} on C{user} (a ban or mute is
            kept until C{meta["until"]}; a kick ends a private room's
            membership);
          - C{"room"}: C{meta["change"]} (a topic, whether edits are
            allowed, or both) is settled against the room as it is then
            (L{chatd.model.settle_room_event}): the event stored holds the
            room's whole settings (C{body}: the topic, C{meta["edits"]}).

        The effects are those of L{chatd.model.RoomAccess.apply} and
        L{chatd.model.Message.changed_by}.  An edit or deletion is checked
        with L{chatd.model.check_target} against the target as stored at
        that moment, and an event with a C{guard} (L{chatd.model.Guard})
        with L{chatd.model.check_guard} against the room as of every event
        before it: a refused one gets no seq.

        If C{client_id} is not C{None} and a message with that
        C{client_id} is already stored in C{room}, store nothing.

        @return: Deferred firing with C{(message, created)} where
            C{message} is the stored L{chatd.model.Message} (the original one
            when C{created} is C{False}), or failing with the
            L{chatd.model.ChatError} of a refused event.  It
            fires only after the event is committed.
        """

    def set_read_markers(marks):
        """
        Store read markers, C{{(user_id, room): seq}}; a stored marker is
        never moved back.

        @return: Deferred firing when they are committed.
        """

    def read_markers(user_id):
        """
        @return: Deferred firing with C{{room: seq}} of C{user_id}.
        """

    def read_after(room, after, limit):
        """
        Read stored messages with seq greater than C{after}.

        @return: Deferred firing with C{(messages, first_seq)}: at most
            C{limit} messages in seq order, and the oldest seq still held
            for the room (the next seq to be issued, if none is held).
        """

    def read_before(room, before, limit):
        """
        Read the newest C{limit} messages with seq less than C{before}.

        @return: Deferred firing with a list of messages in seq order.
        """

    def prune(before_ms):
        """
        Delete each room's messages older than C{before_ms} (oldest first,
        stopping at the first message to keep), and remember the oldest
        seq still held for L{read_after}'s C{first_seq}.

        @return: Deferred firing with the number of messages deleted.
        """

    def share_presence(node, rooms, ttl_ms):
        """
        Replace C{node}'s presence lease: who is in each room there
        (C{{room: Headcount}}, L{chatd.model.Headcount}), valid for
        C{ttl_ms} ms unless renewed.

        @return: Deferred firing with C{{room: Headcount}} over the other
            nodes whose leases are live (their users joined, their guests
            summed).
        """

    def ping():
        """
        Check the store answers (a trivial query).

        @return: Deferred firing with C{None}, or failing.
        """

    def close():
        """
        Release connections and files.

        @return: Deferred firing when done.
        """


class IIdentityStore(Interface):
    """
    Where users, sessions, invitations and API keys are kept (the message
    stores are this too).  Secrets are never stored: sessions, invitations
    and keys by the SHA-256 of theirs, passwords as argon2 hashes.

    Every method returns a Deferred.
    """

    secret = Attribute("The deployment's random secret (once open), shared by its nodes.")

    def add_user(user_id, name, password, now_ms):
        """
        @return: Deferred firing with C{False} if the id is taken.
        """

    def get_user(user_id):
        """
        @return: Deferred firing with C{(name, password_hash, disabled)} or None.
        """

    def set_password(user_id, password):
        """
        Replace an account's password hash.
        """

    def disable_user(user_id, disabled, now_ms):
        """
        Disable (or enable) a user and end their sessions.

        @return: Deferred firing with the number of sessions ended.
        """

    def disabled_users(user_ids):
        """
        @return: Deferred firing with the set of those disabled.
        """

    def create_session(session, user_id, csrf, now_ms, expires_ms):
        """
        Store a session (and forget expired ones).
        """

    def get_session(session, now_ms):
        """
        @return: Deferred firing with C{(user_id, name, csrf, expires_ms)}
            of a live session of an enabled user, or None.
        """

    def live_sessions(sessions, now_ms):
        """
        @return: Deferred firing with the set of those C{sessions} that are
            live (not ended or expired, of an enabled user).
        """

    def end_sessions(session=None, user_id=None):
        """
        End one session, or all of a user's.

        @return: Deferred firing with how many ended.
        """

    def add_invite(invite, now_ms, expires_ms):
        """
        Store an invitation.
        """

    def use_invite(invite, user_id, now_ms):
        """
        @return: Deferred firing with whether the invitation was valid
            (and is now used up).
        """

    def add_key(key_id, digest, name, now_ms):
        """
        Store an API key.
        """

    def get_key(key_id):
        """
        @return: Deferred firing with C{(digest, name)} of a live key, or None.
        """

    def revoke_key(key_id, now_ms):
        """
        @return: Deferred firing with whether a live key was revoked.
        """


class IBusSubscription(Interface):
    """
    A listener's place on a bus.
    """

    def stop():
        """
        Hear nothing more.  Safe to call twice.
        """


class IBusListener(Interface):
    """
    What a bus tells (the chat core, on every node).
    """

    def hint(room, last_seq, messages):
        """
        Messages were committed in C{room}, up to seq C{last_seq}.

        @param messages: some of them, in seq order, or none (the bus may
            carry only the seq); the store has them all.  A hint may come
            late, twice or never: it is a hint, and the store is the truth.
        """

    def catch_up():
        """
        Hints may have been lost: check the store for what was missed.

        Called when the subscription goes live (after every reconnect of
        a bus between processes), and every little while as long as the
        bus is not connected.
        """

    def signal(room, signal):
        """
        An ephemeral signal of C{room} (a typing start or stop: a small
        dict), as some node published it (this one's too: a listener
        tells its own apart).  Never stored, no seq: one that is lost is
        lost.
        """


class IBus(Interface):
    """
    How nodes sharing a store hear about each other's commits.

    Every listener hears every hint published after it subscribed, the
    publisher's own included, in the order each publisher published them.
    """

    def publish(room, last_seq, messages):
        """
        Tell every listener (this node's as well) that C{messages}, up to
        seq C{last_seq}, were committed in C{room}.  Never raises, never
        waits: a bus that cannot send drops the hint.
        """

    def subscribe(listener):
        """
        Start telling C{listener} (an L{IBusListener}) every hint; its
        C{catch_up} is called once the subscription is live.

        @return: an L{IBusSubscription}.
        """

    def signal(room, signal):
        """
        Tell every listener (this node's as well) an ephemeral signal of
        C{room}: a small JSON-able dict, delivered to the other nodes'
        rooms without a seq and without touching the log.  Never raises,
        never waits: a bus that cannot send it now (not connected, or the
        signal too big) drops it.
        """
