package frontend

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/invokex/invokex/internal/controlplane"
	"github.com/invokex/invokex/internal/errdefs"
)

// Published versions: PublishVersion and ListVersionsByFunction. Reading,
// invoking and deleting a version go through the function routes with a
// Qualifier (or a NAME:N / qualified ARN function name).

// publishVersion serves PublishVersion: 201 and the new version's
// FunctionConfiguration (or the newest version's, when $LATEST has not
// changed since it was published).
func (s *Server) publishVersion(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	var in publishVersionInput
	if err := decodeOptionalJSON(w, r, "PublishVersion", &in); err != nil {
		return err
	}
	cfg, err := s.api.PublishVersion(r.Context(), name, &controlplane.PublishInput{
		CodeSha256:  in.CodeSha256,
		Description: in.Description,
		RevisionID:  in.RevisionId,
	})
	if err != nil {
		return err
	}
	return writeJSON(w, http.StatusCreated, s.toConfiguration(cfg))
}

// listVersionsByFunction serves ListVersionsByFunction: $LATEST first, then
// the versions in ascending order, every FunctionArn qualified.
func (s *Server) listVersionsByFunction(w http.ResponseWriter, r *http.Request) error {
	name, err := s.resolveLatest(r)
	if err != nil {
		return err
	}
	marker, max, err := pageParams(r)
	if err != nil {
		return err
	}
	vs, next, err := s.api.ListVersionsByFunction(r.Context(), name, marker, max)
	if err != nil {
		return err
	}
	out := &listVersionsOutput{Versions: make([]*functionConfiguration, 0, len(vs)), NextMarker: next}
	for _, v := range vs {
		out.Versions = append(out.Versions, s.toQualifiedConfiguration(v))
	}
	return writeJSON(w, http.StatusOK, out)
}

// decodeOptionalJSON is decodeJSON for operations whose every member is
// optional: an empty body is an empty document (the SDKs send "{}", a
// hand-written request may send nothing).
func decodeOptionalJSON(w http.ResponseWriter, r *http.Request, op string, v any) error {
	b, err := readBody(w, r, maxJSONBody, fmt.Sprintf("Request must be smaller than %d bytes for the %s operation", maxJSONBody, op))
	if err != nil || len(b) == 0 {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("Could not parse request body into json: %s: %w", jsonErrorText(err), errdefs.ErrInvalidRequestContent)
	}
	return nil
}
