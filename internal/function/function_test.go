package function

import (
	"errors"
	"strings"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

func TestParseName(t *testing.T) {
	for in, want := range map[string][2]string{
		"my-fn_1": {"my-fn_1", ""},
		"arn:aws:lambda:us-east-1:123456789012:function:my-fn":         {"my-fn", ""},
		"arn:aws:lambda:us-east-1:123456789012:function:my-fn:$LATEST": {"my-fn", "$LATEST"},
		"123456789012:function:my-fn:7":                                {"my-fn", "7"},
		"function:my-fn":                                               {"my-fn", ""},
		"my-fn:7":                                                      {"my-fn", "7"},
		"my-fn:$LATEST":                                                {"my-fn", "$LATEST"},
		"my-fn:live":                                                   {"my-fn", "live"},
	} {
		name, q, err := ParseName(in)
		if err != nil || name != want[0] || q != want[1] {
			t.Errorf("ParseName(%q) = %q, %q, %v; want %q, %q", in, name, q, err, want[0], want[1])
		}
	}
	for _, bad := range []string{"", "../x", "a/b", "a b", strings.Repeat("a", 65), "arn:aws:lambda:us-east-1:1:function:x", "x\x00", "my-fn:", ":7", "my-fn:7:8", "my-fn:a/b"} {
		if _, _, err := ParseName(bad); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("ParseName(%q) err = %v, want ErrInvalidParameter", bad, err)
		}
	}
}

func valid() *Config {
	c := &Config{Name: "f", Runtime: "provided.al2023"}
	c.ApplyDefaults()
	return c
}

func TestValidate(t *testing.T) {
	if err := valid().Validate(); err != nil {
		t.Fatalf("defaults are invalid: %v", err)
	}
	for name, mut := range map[string]func(*Config){
		"timeout 0":       func(c *Config) { c.Timeout = 0 },
		"timeout 901":     func(c *Config) { c.Timeout = 901 },
		"memory 127":      func(c *Config) { c.MemorySize = 127 },
		"memory 10241":    func(c *Config) { c.MemorySize = 10241 },
		"ephemeral 511":   func(c *Config) { c.EphemeralStorage = 511 },
		"bad name":        func(c *Config) { c.Name = "a.b" },
		"arm64":           func(c *Config) { c.Architectures = []string{"arm64"} },
		"reserved env":    func(c *Config) { c.Environment = map[string]string{"AWS_REGION": "x"} },
		"bad env key":     func(c *Config) { c.Environment = map[string]string{"1X": "x"} },
		"env over 4 KB":   func(c *Config) { c.Environment = map[string]string{"K": strings.Repeat("v", 4096)} },
		"long desc":       func(c *Config) { c.Description = strings.Repeat("d", 257) },
		"handler newline": func(c *Config) { c.Handler = "a\nb" },
		"snapstart value": func(c *Config) { c.SnapStart.ApplyOn = "Always" },
	} {
		c := valid()
		mut(c)
		if err := c.Validate(); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: err = %v, want ErrInvalidParameter", name, err)
		}
	}
	c := valid()
	c.Environment = map[string]string{"K": strings.Repeat("v", 4095)} // exactly 4096 bytes
	if err := c.Validate(); err != nil {
		t.Errorf("environment of exactly 4 KB refused: %v", err)
	}
}

func TestCloneIsDeep(t *testing.T) {
	n := 3
	c := valid()
	c.Environment = map[string]string{"A": "1"}
	c.ReservedConcurrency = &n
	d := c.Clone()
	d.Environment["A"] = "2"
	*d.ReservedConcurrency = 4
	d.Architectures[0] = "x"
	if c.Environment["A"] != "1" || *c.ReservedConcurrency != 3 || c.Architectures[0] != "x86_64" {
		t.Fatalf("Clone shares state: %+v", c)
	}
}

func TestMessageStripsKind(t *testing.T) {
	err := errdefs.Invalid("Timeout %d is out of range", 0)
	if got := errdefs.Message(err); got != "Timeout 0 is out of range" {
		t.Fatalf("Message = %q", got)
	}
	if got := errdefs.Message(errors.New("plain")); got != "plain" {
		t.Fatalf("Message = %q", got)
	}
}

func TestSnapStartDefaultsAndValues(t *testing.T) {
	c := valid()
	if c.SnapStart.ApplyOn != SnapStartNone || c.SnapStart.OptimizationStatus != OptimizationOff {
		t.Fatalf("defaults: SnapStart = %+v, want None/Off", c.SnapStart)
	}
	if c.SnapStart.Enabled() || c.SnapStart.On() {
		t.Fatalf("default SnapStart reports Enabled=%v On=%v", c.SnapStart.Enabled(), c.SnapStart.On())
	}
	for _, v := range []SnapStartApplyOn{"", SnapStartNone, SnapStartPublishedVersions} {
		if err := ValidateSnapStart(v); err != nil {
			t.Errorf("ValidateSnapStart(%q) = %v", v, err)
		}
	}
	err := ValidateSnapStart("publishedversions")
	if !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "snapStart.applyOn") {
		t.Errorf("ValidateSnapStart(lower case) = %v, want ErrInvalidParameter naming snapStart.applyOn", err)
	}
	c.SnapStart = SnapStart{ApplyOn: SnapStartPublishedVersions, OptimizationStatus: OptimizationOn}
	if !c.SnapStart.Enabled() || !c.SnapStart.On() {
		t.Fatalf("SnapStart %+v reports Enabled=%v On=%v", c.SnapStart, c.SnapStart.Enabled(), c.SnapStart.On())
	}
	if d := c.Clone(); d.SnapStart != c.SnapStart {
		t.Fatalf("Clone dropped SnapStart: %+v", d.SnapStart)
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string]int64{"1": 1, "42": 42, "9007199254740991": MaxVersion} {
		if n, ok := ParseVersion(in); !ok || n != want {
			t.Errorf("ParseVersion(%q) = %d, %v; want %d, true", in, n, ok, want)
		}
	}
	for _, bad := range []string{"", "0", "01", "$LATEST", "live", "-1", "1.5", "9007199254740992", "99999999999999999999"} {
		if n, ok := ParseVersion(bad); ok {
			t.Errorf("ParseVersion(%q) = %d, true; want false", bad, n)
		}
	}
}

func TestQualifiedARN(t *testing.T) {
	if got := QualifiedARN("us-east-1", "000000000000", "f", "3"); got != "arn:aws:lambda:us-east-1:000000000000:function:f:3" {
		t.Errorf("QualifiedARN = %q", got)
	}
	if got := QualifiedARN("us-east-1", "000000000000", "f", ""); got != ARN("us-east-1", "000000000000", "f") {
		t.Errorf("unqualified QualifiedARN = %q", got)
	}
}

func TestSnapStartNotForNode(t *testing.T) {
	c := &Config{Name: "f", Runtime: "nodejs20.x", Handler: "index.handler", Role: "arn:aws:iam::000000000000:role/x",
		SnapStart: SnapStart{ApplyOn: SnapStartPublishedVersions}}
	c.ApplyDefaults()
	if err := c.Validate(); !errors.Is(err, errdefs.ErrInvalidParameter) || !strings.Contains(err.Error(), "not supported for SnapStart") {
		t.Fatalf("SnapStart on nodejs20.x: %v", err)
	}
	c.Runtime = "python3.11"
	if err := c.Validate(); err != nil {
		t.Fatalf("SnapStart on python3.11: %v", err)
	}
}
