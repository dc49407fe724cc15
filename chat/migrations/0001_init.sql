-- Conversations and their messages.
CREATE TABLE conversations (
    id            uuid PRIMARY KEY,
    owner         text        NOT NULL,
    title         text        NOT NULL DEFAULT '',
    model         text,
    system_prompt text,
    message_count integer     NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The owner's list, newest activity first, paged by (updated_at, id).
CREATE INDEX conversations_owner_recent ON conversations (owner, updated_at DESC, id DESC);

CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    conversation_id uuid        NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer     NOT NULL,
    role            text        NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         text        NOT NULL,
    model           text,
    provider        text,
    cached          boolean     NOT NULL DEFAULT false,
    finish_reason   text,
    latency_ms      integer,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (conversation_id, seq)
);
