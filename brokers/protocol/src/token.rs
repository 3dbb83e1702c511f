//! A bearer token that a reload may replace while the clients that send it keep running.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// The token a client sends, shared by every clone of the client (and by every client
/// given the same `Token`): [`Token::set`] takes effect at the next request of each.
#[derive(Clone, Default)]
pub struct Token(Arc<ArcSwapOption<String>>);

impl Token {
    /// `None` or an empty string: no token.
    pub fn new(token: Option<String>) -> Token {
        Token(Arc::new(ArcSwapOption::from(
            token.filter(|t| !t.is_empty()).map(Arc::new),
        )))
    }

    pub fn get(&self) -> Option<Arc<String>> {
        self.0.load_full()
    }

    /// Replaces the token; `true` when it differs from the one before.
    pub fn set(&self, token: Option<String>) -> bool {
        let token = token.filter(|t| !t.is_empty()).map(Arc::new);
        let before = self.0.swap(token.clone());
        before.as_deref() != token.as_deref()
    }

    /// `rb` with `Authorization: Bearer` when there is a token.
    pub fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &*self.0.load() {
            Some(t) => rb.bearer_auth(t.as_str()),
            None => rb,
        }
    }
}

impl From<Option<String>> for Token {
    fn from(token: Option<String>) -> Token {
        Token::new(token)
    }
}

impl std::fmt::Debug for Token {
    // Never the secret itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.load().is_some() {
            "Token(set)"
        } else {
            "Token(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_token_reaches_every_holder_and_empty_is_none() {
        let a = Token::new(Some(String::new()));
        assert!(a.get().is_none());
        let b = a.clone();
        assert!(b.set(Some("new".into())));
        assert_eq!(a.get().as_deref().map(String::as_str), Some("new"));
        assert!(!a.set(Some("new".into())), "the same token is no change");
        assert!(a.set(None));
        assert!(b.get().is_none());
        assert_eq!(
            format!("{:?}", Token::new(Some("secret".into()))),
            "Token(set)"
        );
    }
}
