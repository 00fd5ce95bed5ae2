use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A number of bytes, parsed from and printed with units ("512MiB", "2GiB").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Units accepted by [`ByteSize::from_str`], longest suffix first so that
/// "MiB" is not read as "B".
const UNITS: &[(&str, u64)] = &[
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Why a size string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    /// Nothing but white space.
    #[error("empty size: expected a number with a unit, such as \"512MiB\"")]
    Empty,
    /// The number part is not a non-negative number.
    #[error("invalid number {number:?} in size {input:?}")]
    BadNumber {
        /// The whole input.
        input: String,
        /// The part read as a number.
        number: String,
    },
    /// The unit is not one of the accepted ones.
    #[error(
        "unknown size unit {unit:?} in {input:?}: use B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"
    )]
    BadUnit {
        /// The whole input.
        input: String,
        /// The unit as written.
        unit: String,
    },
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl ByteSize {
    /// `n` KiB.
    pub const fn kib(n: u64) -> Self {
        ByteSize(n << 10)
    }
    /// `n` MiB.
    pub const fn mib(n: u64) -> Self {
        ByteSize(n << 20)
    }
    /// `n` GiB.
    pub const fn gib(n: u64) -> Self {
        ByteSize(n << 30)
    }
    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
    /// The number of bytes as usize (saturating on 32-bit targets).
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl From<usize> for ByteSize {
    fn from(n: usize) -> Self {
        ByteSize(n as u64)
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if s.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(s.len());
        let (number, unit) = (s[..split].replace('_', ""), s[split..].trim());
        let multiplier = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, m)| *m)
                .ok_or_else(|| ParseSizeError::BadUnit {
                    input: input.to_string(),
                    unit: unit.to_string(),
                })?
        };
        let bad_number = || ParseSizeError::BadNumber {
            input: input.to_string(),
            number: number.clone(),
        };
        if number.contains('.') {
            let value: f64 = number.parse().map_err(|_| bad_number())?;
            let bytes = (value * multiplier as f64).round();
            if !bytes.is_finite() || bytes >= u64::MAX as f64 {
                return Err(ParseSizeError::Overflow(input.to_string()));
            }
            Ok(ByteSize(bytes as u64))
        } else {
            let value: u64 = number.parse().map_err(|_| bad_number())?;
            value
                .checked_mul(multiplier)
                .map(ByteSize)
                .ok_or_else(|| ParseSizeError::Overflow(input.to_string()))
        }
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest binary unit that divides the value exactly, else
    /// one decimal place of the largest unit not above it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BINARY: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, m) in BINARY {
            if self.0 >= m {
                return if self.0 % m == 0 {
                    write!(f, "{}{}", self.0 / m, name)
                } else {
                    write!(f, "{:.1}{}", self.0 as f64 / m as f64, name)
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["string", "integer"],
            "description": "A size: a number with a unit (B, KiB, MiB, GiB, TiB as powers of 1024; KB, MB, GB, TB as powers of 1000), or a plain number of bytes.",
            "examples": ["512MiB", "2GiB"]
        })
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % 1024 == 0 || self.0 < 1024 {
            s.serialize_str(&self.to_string())
        } else {
            // Not a whole unit: keep it exact.
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"512MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size must not be negative, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!("512MiB".parse(), Ok(ByteSize::mib(512)));
        assert_eq!("2GiB".parse(), Ok(ByteSize::gib(2)));
        assert_eq!("2 GB".parse(), Ok(ByteSize(2_000_000_000)));
        assert_eq!("1.5KiB".parse(), Ok(ByteSize(1536)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("1_024B".parse(), Ok(ByteSize(1024)));
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        let err = "512XB".parse::<ByteSize>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown size unit \"XB\" in \"512XB\": use B, KiB, MiB, GiB, TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000)"
        );
        assert!(matches!("".parse::<ByteSize>(), Err(ParseSizeError::Empty)));
        assert!(matches!(
            "1.2.3MiB".parse::<ByteSize>(),
            Err(ParseSizeError::BadNumber { .. })
        ));
        assert!(matches!(
            "99999999999TiB".parse::<ByteSize>(),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_round_trip() {
        for s in ["512MiB", "2GiB", "3KiB", "100B"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
        assert_eq!(ByteSize(1536 * 1024 + 1).to_string(), "1.5MiB");
    }
}
