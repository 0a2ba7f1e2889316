-- Roles, their scopes, and who holds them. A role with an audience appears only in
-- tokens for that audience, so a token carries the roles its resource server reads and
-- headers stay small. A scope that any role maps is restricted: only holders of such a
-- role are granted it; other scopes (openid, profile, …) need no role.
CREATE TABLE roles (
    name         TEXT PRIMARY KEY,
    audience     TEXT,
    description  TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);

CREATE TABLE role_scopes (
    role   TEXT NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    scope  TEXT NOT NULL,
    PRIMARY KEY (role, scope)
);

CREATE TABLE user_groups (
    name        TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL
);

CREATE TABLE user_group_members (
    group_name  TEXT NOT NULL REFERENCES user_groups (name) ON DELETE CASCADE,
    user_id     TEXT NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    PRIMARY KEY (group_name, user_id)
);

-- subject_kind is 'user', 'group' or 'client'.
CREATE TABLE role_bindings (
    role          TEXT NOT NULL REFERENCES roles (name) ON DELETE CASCADE,
    subject_kind  TEXT NOT NULL,
    subject_id    TEXT NOT NULL,
    granted_at    BIGINT NOT NULL,
    PRIMARY KEY (role, subject_kind, subject_id)
);
CREATE INDEX role_bindings_subject ON role_bindings (subject_kind, subject_id);
