//! Bare Git mirrors of the projects kas needs, fetched on a poll interval or a push webhook,
//! and reads of files at a commit straight from the object database.
