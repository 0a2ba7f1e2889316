//! Scopes as RFC 6749 §3.3 writes them: space-separated tokens of printable ASCII other
//! than `"` and `\`.

use std::collections::BTreeSet;

/// A set of valid scope tokens, written back in a stable order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(BTreeSet<String>);

/// A scope string that breaks RFC 6749 §3.3.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scope must be space-separated tokens of printable ASCII, without '\"' or '\\\\'")]
pub struct BadScope;

impl Scopes {
    /// Parses a `scope` parameter. Tokens are separated by single spaces (§3.3); empty
    /// input is the empty set.
    pub fn parse(scope: &str) -> Result<Self, BadScope> {
        if scope.is_empty() {
            return Ok(Self::default());
        }
        scope
            .split(' ')
            .map(|token| {
                let valid = !token.is_empty()
                    && token.bytes().all(|b| {
                        b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)
                    });
                valid.then(|| token.to_owned()).ok_or(BadScope)
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// The scopes of `self` that are not in `allowed`.
    pub fn beyond<'a>(&'a self, allowed: &'a Scopes) -> impl Iterator<Item = &'a str> {
        self.0.difference(&allowed.0).map(String::as_str)
    }
}

impl std::fmt::Display for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope)?;
        }
        Ok(())
    }
}

impl<S: Into<String>> FromIterator<S> for Scopes {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        Self(iter.into_iter().map(Into::into).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_scopes_parse_and_print_sorted() {
        let scopes = Scopes::parse("orders:write openid orders:read").unwrap();
        assert_eq!(scopes.to_string(), "openid orders:read orders:write");
        assert!(scopes.contains("openid"));
        assert!(Scopes::parse("").unwrap().is_empty());
        assert_eq!(Scopes::parse("a a").unwrap().to_string(), "a");
        assert!(Scopes::parse("!#[]~").is_ok());
    }

    #[test]
    fn invalid_scopes_are_refused() {
        for bad in [
            "a  b", " a", "a ", "a\"b", "a\\b", "a\tb", "é", "a\nb", "\u{7f}",
        ] {
            assert_eq!(Scopes::parse(bad), Err(BadScope), "{bad:?}");
        }
    }

    #[test]
    fn subsets_and_excess() {
        let allowed = Scopes::parse("a b c").unwrap();
        let asked = Scopes::parse("a d").unwrap();
        assert!(!asked.is_subset(&allowed));
        assert_eq!(asked.beyond(&allowed).collect::<Vec<_>>(), ["d"]);
        assert!(Scopes::parse("c a").unwrap().is_subset(&allowed));
    }
}
