package protocol

import (
	"bytes"
	"strings"
	"testing"
)

func TestAssignmentRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteAssignment(&buf, Assignment{Hostname: "sandbox-ix-1"}); err != nil {
		t.Fatal(err)
	}
	buf.WriteString("NEXT")
	a, err := ReadAssignment(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if a.Hostname != "sandbox-ix-1" {
		t.Errorf("hostname %q", a.Hostname)
	}
	if buf.String() != "NEXT" {
		t.Errorf("ReadAssignment consumed what follows the line: %q left", buf.String())
	}
}

func TestReadAssignmentRejects(t *testing.T) {
	for name, in := range map[string]string{
		"no hostname":         "{}\n",
		"long hostname":       `{"hostname":"` + strings.Repeat("h", 65) + "\"}\n",
		"not json":            "hello\n",
		"too long":            strings.Repeat("x", maxAssignment+1) + "\n",
		"cut short":           `{"hostname":"a"}`,
		"renew and hostname":  `{"hostname":"a","renew":{"restore":{"Seed":"AAAAAAAAAAAAAAAAAAAAAA=="}}}` + "\n",
		"renew with hostname": `{"renew":{"restore":{"Hostname":"a","Seed":"AAAAAAAAAAAAAAAAAAAAAA=="}}}` + "\n",
		"renew without seed":  `{"renew":{"restore":{}}}` + "\n",
		"renew with 8 B seed": `{"renew":{"restore":{"Seed":"AAAAAAAAAAA="}}}` + "\n",
	} {
		if _, err := ReadAssignment(strings.NewReader(in)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestRenewalRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	in := Assignment{Renew: &Renewal{Restore: Restore{HostUnixNano: 42, Seed: bytes.Repeat([]byte{7}, MinRenewalSeed)}, WarmUp: true}}
	if err := WriteAssignment(&buf, in); err != nil {
		t.Fatal(err)
	}
	a, err := ReadAssignment(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if a.Hostname != "" || a.Renew == nil || !a.Renew.WarmUp || a.Renew.Restore.HostUnixNano != 42 || !bytes.Equal(a.Renew.Restore.Seed, bytes.Repeat([]byte{7}, MinRenewalSeed)) {
		t.Errorf("read %+v, renew %+v", a, a.Renew)
	}
}
