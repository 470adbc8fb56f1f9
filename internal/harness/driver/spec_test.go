package driver

import (
	"errors"
	"testing"

	"github.com/invokex/invokex/internal/errdefs"
)

func TestSpecValidate(t *testing.T) {
	dir := t.TempDir()
	ok := Spec{ID: "ix-1", CodeDir: dir, MemoryMB: 128, EphemeralMB: 512}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid spec: %v", err)
	}
	for name, mut := range map[string]func(*Spec){
		"bad id":          func(s *Spec) { s.ID = "../x" },
		"long id":         func(s *Spec) { s.ID = "a234567890123456789012345678901234567890x" },
		"no memory":       func(s *Spec) { s.MemoryMB = 0 },
		"no ephemeral":    func(s *Spec) { s.EphemeralMB = -1 },
		"relative code":   func(s *Spec) { s.CodeDir = "code" },
		"missing code":    func(s *Spec) { s.CodeDir = dir + "/missing" },
		"missing runtime": func(s *Spec) { s.RuntimeDir = dir + "/missing" },
	} {
		s := ok
		mut(&s)
		if err := s.Validate(); !errors.Is(err, errdefs.ErrInvalidParameter) {
			t.Errorf("%s: %v, want ErrInvalidParameter", name, err)
		}
	}
}
