namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// SiglipImageProcessor as PaliGemmaProcessor configures it: bicubic resize to size x size, rescale by 1/255, normalise
/// with mean 0.5 and std 0.5, channels first.
/// </summary>
public static class ImagePreprocessor
{
    /// <summary>transformers' rescale_factor, the double nearest 1/255.</summary>
    private const double RescaleFactor = 0.00392156862745098;

    private const float Mean = 0.5f;
    private const float StandardDeviation = 0.5f;

    /// <summary>The output for each byte value: every pixel maps through this table, so it is computed once.</summary>
    private static readonly float[] s_valueForByte = BuildValueTable();

    /// <summary>Returns the model's pixel_values for one image: float32 [3, size, size].</summary>
    public static float[] ToPixelValues(RgbImage image, int size)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);
        var result = new float[checked(3 * size * size)];
        ToPixelValues(image, size, result);
        return result;
    }

    /// <summary>Writes the model's pixel_values for one image, float32 [3, size, size], into <paramref name="destination"/>.</summary>
    /// <exception cref="ArgumentException"><paramref name="destination"/> is not exactly 3 * size * size long.</exception>
    public static void ToPixelValues(RgbImage image, int size, Span<float> destination)
    {
        ArgumentNullException.ThrowIfNull(image);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);
        int planeLength = checked(size * size);
        if (destination.Length != checked(3 * planeLength))
        {
            throw new ArgumentException(
                $"pixel_values for a {size}x{size} image need {3L * planeLength} floats [3, {size}, {size}], but the destination holds {destination.Length}.",
                nameof(destination));
        }

        // transformers resizes unconditionally; PIL's resize to the same size is a copy, so skipping it changes nothing.
        RgbImage resized = image.Width == size && image.Height == size ? image : PilResize.Bicubic(image, size, size);
        ReadOnlySpan<byte> pixels = resized.Pixels;
        ReadOnlySpan<float> table = s_valueForByte;
        Span<float> red = destination.Slice(0, planeLength);
        Span<float> green = destination.Slice(planeLength, planeLength);
        Span<float> blue = destination.Slice(2 * planeLength, planeLength);
        for (int i = 0; i < planeLength; i++)
        {
            red[i] = table[pixels[3 * i]];
            green[i] = table[pixels[3 * i + 1]];
            blue[i] = table[pixels[3 * i + 2]];
        }
    }

    private static float[] BuildValueTable()
    {
        var table = new float[256];
        for (int value = 0; value < table.Length; value++)
        {
            // rescale: uint8 -> float64, multiply, then cast to float32; normalize: (x - mean) / std in float32.
            float rescaled = (float)(value * RescaleFactor);
            table[value] = (rescaled - Mean) / StandardDeviation;
        }

        return table;
    }
}
