//! A token's claims as the issuer wrote them. Only the members the policy
//! reads are parsed into values; the rest stay in the payload text, which
//! is what the session set-up passes on. Building a full JSON map for every
//! token cost more than the rest of the policy together.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// One member the policy reads: absent, or present with any JSON value
/// (including `null`, which is not the same as absent).
#[derive(Debug, Clone, Default)]
enum Member {
    #[default]
    Absent,
    Present(Value),
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Member::Present)
    }
}

/// The members the policy reads. A duplicate of any of them makes the
/// payload invalid: which copy counts would otherwise be a guess.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Policed {
    iss: Member,
    sub: Member,
    aud: Member,
    exp: Member,
    nbf: Member,
    iat: Member,
    is_anonymous: Member,
}

#[derive(Debug, Clone)]
pub struct Claims {
    json: Box<str>,
    policed: Policed,
}

/// The payload is not a JSON object (or repeats a policed member).
#[derive(Debug, PartialEq, Eq)]
pub struct NotAnObject;

impl Claims {
    /// Parses a payload; the text is kept as it is.
    pub fn from_json(json: String) -> Result<Claims, NotAnObject> {
        // A struct would also accept an array, member by position.
        if !json.trim_start().starts_with('{') {
            return Err(NotAnObject);
        }
        let policed = serde_json::from_str(&json).map_err(|_| NotAnObject)?;
        Ok(Claims {
            json: json.into_boxed_str(),
            policed,
        })
    }

    /// Claims the proxy makes itself (a tokenless session's).
    pub fn from_map(map: serde_json::Map<String, Value>) -> Claims {
        let json = Value::Object(map).to_string();
        // An object's own text always parses back.
        let policed = serde_json::from_str(&json).unwrap_or_default();
        Claims {
            json: json.into_boxed_str(),
            policed,
        }
    }

    /// A claim the policy reads (`iss`, `sub`, `aud`, `exp`, `nbf`, `iat`,
    /// `is_anonymous`); `None` when absent. Other names are not parsed and
    /// always give `None`: read them from [`Claims::members`].
    pub fn get(&self, name: &str) -> Option<&Value> {
        let p = &self.policed;
        let member = match name {
            "iss" => &p.iss,
            "sub" => &p.sub,
            "aud" => &p.aud,
            "exp" => &p.exp,
            "nbf" => &p.nbf,
            "iat" => &p.iat,
            "is_anonymous" => &p.is_anonymous,
            _ => return None,
        };
        match member {
            Member::Present(v) => Some(v),
            Member::Absent => None,
        }
    }

    /// The payload's JSON text, exactly as received.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Every member in the payload's order, values as raw JSON text. A name
    /// given twice keeps its last value, as JSON parsers commonly do.
    pub fn members(&self) -> Vec<(Cow<'_, str>, &RawValue)> {
        // The text was parsed whole in `from_json`, so this cannot fail.
        let Ok(Members(all)) = serde_json::from_str::<Members<'_>>(&self.json) else {
            return Vec::new();
        };
        let mut kept: Vec<(Cow<'_, str>, &RawValue)> = Vec::with_capacity(all.len());
        for (name, value) in all {
            match kept.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = value,
                None => kept.push((name, value)),
            }
        }
        kept
    }
}

/// The members of an object, borrowed from the text where no unescaping is
/// needed.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Name(name)) = map.next_key()? {
                    out.push((name, map.next_value()?));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(text: &str) -> Result<Claims, NotAnObject> {
        Claims::from_json(text.to_owned())
    }

    #[test]
    fn policed_members_are_parsed_and_null_is_not_absent() {
        let c = parse(r#"{"sub":"alice","exp":12.5,"aud":["a","b"],"nbf":null,"x":{"y":1}}"#)
            .expect("object");
        assert_eq!(c.get("sub"), Some(&json!("alice")));
        assert_eq!(c.get("exp"), Some(&json!(12.5)));
        assert_eq!(c.get("aud"), Some(&json!(["a", "b"])));
        assert_eq!(c.get("nbf"), Some(&Value::Null));
        assert_eq!(c.get("iat"), None);
        assert_eq!(c.get("x"), None, "only policed members are parsed");
    }

    #[test]
    fn what_is_not_an_object_is_refused() {
        for text in [
            "[]",
            r#"["alice", 1]"#,
            "\"sub\"",
            "1",
            "null",
            "{",
            r#"{"sub":"a"} x"#,
            r#"{"exp":1,"exp":2}"#,
            r#"{"sub":"a","\u0073ub":"b"}"#,
        ] {
            assert_eq!(parse(text).err(), Some(NotAnObject), "{text}");
        }
    }

    #[test]
    fn members_keep_order_raw_values_and_the_last_duplicate() {
        let c = parse(r#" {"b":1, "a\"q":[1, 2],"c":"x","b":{"z":null}} "#).expect("object");
        let members: Vec<(String, String)> = c
            .members()
            .into_iter()
            .map(|(n, v)| (n.into_owned(), v.get().to_owned()))
            .collect();
        assert_eq!(
            members,
            [
                ("b".to_owned(), r#"{"z":null}"#.to_owned()),
                ("a\"q".to_owned(), "[1, 2]".to_owned()),
                ("c".to_owned(), r#""x""#.to_owned()),
            ]
        );
    }
}
