analyze cr_line_endings.ein
