CREATE TABLE greetings (
    name TEXT PRIMARY KEY,
    times BIGINT NOT NULL
);
