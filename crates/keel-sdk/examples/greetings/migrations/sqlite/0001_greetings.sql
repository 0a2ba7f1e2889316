CREATE TABLE greetings (
    name TEXT PRIMARY KEY,
    times INTEGER NOT NULL
);
